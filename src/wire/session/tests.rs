//! Unit tests of the sessions.
