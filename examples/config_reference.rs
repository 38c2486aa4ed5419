//! Prints docs/configuration.md, made from the command-line definition:
//!
//!   cargo run --example config_reference > docs/configuration.md

fn main() {
    print!("{}", fn_image_resolver::cli::reference::markdown());
}
