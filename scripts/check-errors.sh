#!/usr/bin/env bash
# check-errors.sh — errors are typed, and no decision is made on their text.
#
# Fails (printing FILE:LINE: what) on, in src/ outside src/cli/ and src/cli.rs:
#  1. a `Result<_, String>` (any `Result` whose error type is `String`,
#     found with balanced `<>`, so `Result<HashMap<String, String>, E>` is
#     fine);
#  2. `.contains(`, `.starts_with(` or `.ends_with(` applied to an error's
#     text: a chain starting at a name usually bound to an error or its
#     message (e, err, error, msg, message, why, reason, explained), the
#     `.error` field of a report, or `to_string()` / `to_lowercase()` of
#     anything. A grep heuristic: assertions (tests check messages) and
#     comments are skipped, and the ALLOW list below names legitimate
#     string tests with the reason.
#
# Usage: scripts/check-errors.sh [ROOT]   (default: the repository root)
set -euo pipefail
root=${1:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$root"

# FILE|SUBSTRING OF THE LINE|REASON — a hit in FILE whose line contains
# SUBSTRING is accepted.
ALLOW=(
)

files=$(find src -name '*.rs' ! -path 'src/cli/*' ! -path 'src/cli.rs' | sort)
[ -n "$files" ] || { echo "check-errors: no sources under $root/src" >&2; exit 2; }

allowed() { # FILE LINE
    local f=$1 line=$2 entry
    for entry in "${ALLOW[@]}"; do
        IFS='|' read -r af asub _ <<<"$entry"
        if [ "$f" = "$af" ] && [[ "$line" == *"$asub"* ]]; then
            return 0
        fi
    done
    return 1
}

hits=0
report() { # FILE:LINE:TEXT WHAT
    echo "$1 -- $2"
    hits=$((hits + 1))
}

# 1. Result<_, String>
while IFS= read -r hit; do
    [ -n "$hit" ] && report "$hit" "Result<_, String>: use a thiserror type with a kind()"
done < <(
    # shellcheck disable=SC2086
    perl -ne '
        next if m{^\s*//};
        my $line = $_;
        while ($line =~ /\bResult<((?:[^<>]++|<(?1)>)*)>/g) {
            my $args = $1; my $depth = 0; my $last = "";
            for my $ch (split //, $args) {
                if ($ch eq "<" || $ch eq "(" || $ch eq "[") { $depth++ }
                elsif ($ch eq ">" || $ch eq ")" || $ch eq "]") { $depth-- }
                if ($ch eq "," && $depth == 0) { $last = ""; next }
                $last .= $ch;
            }
            $last =~ s/^\s+|\s+$//g;
            if ($last eq "String" && $args =~ /,/) { chomp $line; print "$ARGV:$.:$line\n"; last }
        }
        close ARGV if eof;
    ' $files
)

# 2. String tests on error text. Method chains split over lines
# (`e.error\n    .as_deref()\n    .is_some_and(|x| x.starts_with(..))`) are
# joined first, reported at their first line.
names='(e|err|error|msg|message|why|reason|explained)'
pat="(\\b${names}\\b(\\s*\\.\\s*[A-Za-z_][A-Za-z0-9_]*(\\(\\))?)*\\s*\\.(contains|starts_with|ends_with)\\()"
pat+="|(\\.error\\b.*\\.(contains|starts_with|ends_with)\\()"
pat+="|((to_string|to_lowercase)\\(\\)\\s*\\.(contains|starts_with|ends_with)\\()"
while IFS= read -r hit; do
    [ -n "$hit" ] || continue
    f=${hit%%:*}
    rest=${hit#*:}
    text=${rest#*:}
    case "$text" in
        *assert*) continue ;;
    esac
    [[ "$text" =~ ^[[:space:]]*// ]] && continue
    allowed "$f" "$text" && continue
    report "$hit" "a string test on an error's text: decide on its kind or code"
done < <(
    # shellcheck disable=SC2086
    PAT="$pat" perl -e '
        my $pat = qr/$ENV{PAT}/;
        for my $f (@ARGV) {
            open my $fh, "<", $f or die "$f: $!";
            my ($start, $acc) = (0, undef);
            my $flush = sub {
                print "$f:$start:$acc\n" if defined $acc && $acc =~ $pat;
            };
            while (my $l = <$fh>) {
                chomp $l;
                if (defined $acc && $l =~ /^\s*\./) {
                    $l =~ s/^\s+//;
                    $acc .= $l;
                    next;
                }
                $flush->();
                ($start, $acc) = ($., $l);
            }
            $flush->();
            close $fh;
        }
    ' $files
)

if [ "$hits" -gt 0 ]; then
    echo "check-errors: $hits problem(s)" >&2
    exit 1
fi
echo "check-errors: ok"
