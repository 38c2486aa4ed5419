fn main() -> std::process::ExitCode {
    fn_image_resolver::cli::run()
}
