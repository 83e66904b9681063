#![no_std]
// The library target exists so proxy-lab-tools can name this crate as a build dependency;
// the program is in the binary target (src/main.rs).
