fn main() {
    std::process::exit(vdrep::cli::main());
}
