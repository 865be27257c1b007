//! A pod's process for the integration tests. The harness spawns it inside a
//! pod cgroup and network namespace (see `harness::pod`).
//!
//! `pod-client connect ADDR COUNT`: COUNT times, connect to ADDR, read to EOF,
//! close. Prints `pid PID` first so the test can match the kernel's view.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pod-client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, addr, count] if cmd == "connect" => {
            let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
            let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
            println!("pid {}", std::process::id());
            for i in 0..count {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .map_err(|e| format!("connect {addr} (#{i}): {e}"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let mut sink = Vec::new();
                stream
                    .read_to_end(&mut sink)
                    .map_err(|e| format!("read {addr} (#{i}): {e}"))?;
            }
            Ok(())
        }
        _ => Err("usage: pod-client connect ADDR COUNT".into()),
    }
}
