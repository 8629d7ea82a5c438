//! `citapulse-bench`: measures citapulse against the floor and a baseline (see BENCHMARKS.md).

fn main() {
    eprintln!("citapulse-bench: not implemented yet");
    std::process::exit(2);
}
