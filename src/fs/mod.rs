//! FUSE passthrough file system over the folder it is mounted on (stub).
