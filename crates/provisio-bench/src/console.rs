//! `--console-pages`: the web console's pages with many enrollments. For each size asked
//! (the first is the baseline), a server starts on a store preloaded with that many
//! individual enrollments; the bench signs in and requests every page one at a time,
//! measuring each request's latency (over loopback: an upper bound of the server's time)
//! and the server's CPU time per request, read from `/proc`.

use std::{path::Path, time::Instant};

use anyhow::{Context, Result, bail};

use crate::{preload, server};

/// One page at one size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PageRow {
    /// Preloaded enrollments.
    pub enrollments: usize,
    /// The page.
    pub page: String,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// The server's CPU time per request, ms.
    pub server_cpu_ms: f64,
}

/// The pages measured, with what each answer must contain.
fn pages(n: usize) -> Vec<(&'static str, String, String)> {
    let mid = n / 2;
    vec![
        ("overview (counts)", "/console/overview".into(), format!(">{n}</span> Individual enrollments")),
        ("enrollments, first page", "/console/enrollments".into(), "pre-0000049".into()),
        (
            "enrollments, a page 90% down",
            format!("/console/enrollments?after=pre-{:07}", n * 9 / 10),
            format!("pre-{:07}", n * 9 / 10 + 1),
        ),
        (
            "enrollments, search by id prefix",
            format!("/console/enrollments?q=pre-{:06}", mid / 10),
            format!("pre-{:06}0", mid / 10),
        ),
        ("enrollment details", format!("/console/enrollments/pre-{mid:07}"), format!("pre-{mid:07}")),
        ("registration records", "/console/registrations".into(), "Registration records".into()),
        ("chart (SVG)", "/console/chart.svg".into(), "<svg".into()),
    ]
}

/// Runs the console pages at each size; prints a table and returns the rows.
///
/// # Errors
/// If a server does not start, the sign-in fails, or a page does not answer as expected.
pub async fn run(exe: &Path, sizes: &[usize], requests: usize) -> Result<Vec<PageRow>> {
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("--console-pages takes sizes of at least 1, e.g. 100,100000");
    }
    let mut rows = Vec::new();
    for &n in sizes {
        println!("preloading {n} enrollments");
        let dir = tempfile::tempdir()?;
        preload(dir.path(), n).await?;
        let srv = server::start_server(exe, None, dir)?;
        let port: u16 = srv.s("deviceEndpoint").rsplit_once(':').and_then(|(_, p)| p.parse().ok()).context("port")?;
        let base = format!("https://localhost:{port}");
        let ca = std::fs::read_to_string(srv.s("caCertFile"))?;
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
            .resolve("localhost", ([127, 0, 0, 1], port).into())
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let r = client
            .post(format!("{base}/console/sign-in"))
            .header("Origin", &base)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("connection_string", &srv.s("serviceConnectionString"))
                    .finish(),
            )
            .send()
            .await?;
        let cookie = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("provisio_session="))
            .and_then(|c| c.split(';').next())
            .map(str::to_owned)
            .with_context(|| format!("the console sign-in set no session (HTTP {})", r.status()))?;
        for (name, path, expect) in pages(n) {
            let get = || client.get(format!("{base}{path}")).header("Cookie", &cookie).send();
            // Warm-up: caches, connections, the page's first rendering.
            for _ in 0..5 {
                let r = get().await?;
                let status = r.status();
                let body = r.text().await?;
                if !status.is_success() || !body.contains(&expect) {
                    bail!("{name} ({path}) with {n} enrollments: HTTP {status}, without `{expect}`");
                }
            }
            let cpu = srv.cpu_secs();
            let mut lat: Vec<f64> = Vec::with_capacity(requests);
            for _ in 0..requests {
                let t = Instant::now();
                let r = get().await?;
                let ok = r.status().is_success();
                let _ = r.bytes().await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                if !ok {
                    bail!("{name}: an error answer during the measurement");
                }
            }
            let cpu_ms = (srv.cpu_secs() - cpu) * 1000.0 / requests as f64;
            lat.sort_by(f64::total_cmp);
            let at = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
            rows.push(PageRow {
                enrollments: n,
                page: name.into(),
                p50_ms: at(0.5),
                p95_ms: at(0.95),
                max_ms: at(1.0),
                server_cpu_ms: cpu_ms,
            });
        }
        drop(srv);
    }
    print_table(&rows, sizes[0]);
    Ok(rows)
}

fn print_table(rows: &[PageRow], base: usize) {
    println!("\n| page | enrollments | p50 ms | p95 ms | max ms | server CPU ms/request | p50 vs {base} |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let baseline = rows.iter().find(|b| b.enrollments == base && b.page == r.page).map_or(r.p50_ms, |b| b.p50_ms);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}× |",
            r.page,
            r.enrollments,
            r.p50_ms,
            r.p95_ms,
            r.max_ms,
            r.server_cpu_ms,
            r.p50_ms / baseline
        );
    }
}
