use clap::Parser;
use tracing_subscriber::EnvFilter;

// Every write allocates on many threads (HTTP, the plugin actor, Raft,
// redb's page buffers); glibc's malloc spent about a tenth of the node's
// CPU there (BENCHMARKS.md). Built without transparent huge pages: the
// kernel zeroing a fresh 2 MiB page on a first touch cost more than the
// TLB saved (about 2 µs of CPU per replicated write).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = EnvFilter::try_from_env("PLEXUS_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=off,cranelift=warn,wasmtime=warn"));
    if std::env::var("PLEXUS_LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .with_writer(std::io::stderr)
            .init();
        plexus::primitives::log::write_json_lines(true);
    } else {
        // Colour only for a person at a terminal: a log file or a pipe
        // gets plain text (and NO_COLOR turns it off everywhere).
        let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour)
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = plexus::cli::Cli::parse();
    match plexus::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plexus: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
