//! `provisio-bench`: starts a `provisio serve`, registers devices over every transport and
//! reports rates, latencies, CPU and RSS next to baselines (see BENCHMARKS.md).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = provisio_bench::BenchArgs::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !args.console_pages.is_empty() {
        let console = async {
            let exe = provisio_bench::server_exe(args.server.as_deref())?;
            provisio_bench::console::run(&exe, &args.console_pages, args.console_requests.max(1)).await
        };
        return match rt.block_on(console) {
            Ok(rows) => {
                if args.json {
                    println!("{}", serde_json::to_string(&rows).unwrap_or_default());
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(provisio_bench::run(args)) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
