//! `cargo run --release -p oxvirt-storage --example storage_bench [DIR] [ITERATIONS]`: the storage
//! benchmark (same as `oxvirt domain bench`).

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| std::env::temp_dir().display().to_string());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let report = oxvirt_storage::bench::run(std::path::Path::new(&dir), n).expect("benchmark");
    for f in &report.figures {
        println!(
            "{:<28} ours {:>8.2?}  bare {:>8.2?}  ratio {:.2}",
            f.verb, f.ours, f.bare, f.ratio
        );
    }
}
