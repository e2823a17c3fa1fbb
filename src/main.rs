fn main() -> std::process::ExitCode {
    tcpnetlock::cli::main()
}
