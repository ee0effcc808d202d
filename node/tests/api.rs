//! Integration tests of the HTTP API against a real model.
