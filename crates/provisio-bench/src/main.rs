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
    match rt.block_on(provisio_bench::run(args)) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
