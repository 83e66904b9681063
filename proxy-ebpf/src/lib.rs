#![no_std]
// The library target exists so proxy-userspace can name this crate as a build dependency;
// the programs are in the binary target (src/main.rs).
