//! Mount lifecycle (stub).
