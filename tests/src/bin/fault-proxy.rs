//! The tests' fault-injecting S3 proxy as a program, for benchmarks (bench/faults.sh):
//! `fault-proxy UPSTREAM [slow_down=PCT] [reset=PCT] [freeze=PCT] [freeze_for=SECS]
//! [reset_within=BYTES] [recycle_within=BYTES] [seed=N]`. It prints
//! `fault-proxy listening on http://127.0.0.1:PORT`, then the fates met so far every second on
//! stderr, and stops when its standard input closes. Loopback only.

use std::{io::Read, time::Duration};

use soma_tests::faults::{FaultPlan, FaultProxy};

fn main() {
    let mut args = std::env::args().skip(1);
    let upstream = args
        .next()
        .expect("usage: fault-proxy http://127.0.0.1:PORT [key=value ...]");
    let mut plan = FaultPlan::clean();
    for arg in args {
        let (key, value) = arg.split_once('=').expect("arguments are key=value");
        let n: u64 = value.parse().expect("values are whole numbers");
        let pct = || u32::try_from(n.min(100)).unwrap_or(100);
        match key {
            "slow_down" => plan.slow_down = pct(),
            "reset" => plan.reset = pct(),
            "freeze" => plan.freeze = pct(),
            "freeze_for" => plan.freeze_for = Duration::from_secs(n),
            "reset_within" => plan.reset_within = n,
            "recycle_within" => plan.recycle_within = n,
            "seed" => plan.seed = n,
            other => panic!("unknown setting {other}"),
        }
    }
    let proxy = FaultProxy::start(&upstream, plan);
    println!("fault-proxy listening on {}", proxy.endpoint());
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        let _ = done_tx.send(());
    });
    loop {
        eprintln!("{:?}", proxy.counts());
        if done_rx.recv_timeout(Duration::from_secs(1)).is_ok() {
            break;
        }
    }
}
