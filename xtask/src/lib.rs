pub mod cluster;
pub mod lab;
