//! `kubectl soma describe ID|latest`.

use soma_proto::v1;

use crate::{
    cli::{IdArg, OutputFormat},
    connect::Agent,
    error::CliError,
    output,
};

/// Shows one backup; json/yaml print its manifest.
pub async fn run(mut agent: Agent, out: OutputFormat, args: IdArg) -> Result<(), CliError> {
    let info = agent
        .client
        .describe_backup(v1::DescribeBackupRequest { backup_id: args.id })
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let manifest = output::manifest(&info)?;
    match out {
        OutputFormat::Table => {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            println!("ID:          {}", info.id);
            println!(
                "Engine:      {} ({})",
                output::engine_name(&info),
                s(&manifest["kind"])
            );
            println!("Target:      {}", info.target);
            println!(
                "Server:      {} (version {})",
                s(&manifest["target"]["server"]),
                s(&manifest["target"]["server_version"])
            );
            println!(
                "Tool:        {} {}",
                s(&manifest["tool"]["name"]),
                s(&manifest["tool"]["version"])
            );
            println!("Started:     {}", info.started_at);
            println!("Completed:   {}", info.completed_at);
            println!(
                "Size:        {} raw, {} stored",
                output::bytes(info.raw_bytes),
                output::bytes(info.stored_bytes)
            );
            println!("Agent:       {}", s(&manifest["agent_version"]));
            if let Some(w) = &info.recovery_window {
                if w.error.is_empty() {
                    println!(
                        "Recoverable: {} (LSN {}) … {} (LSN {}), timeline {}",
                        output::short_time(&w.earliest_time),
                        w.earliest_lsn,
                        output::short_time(&w.latest_time),
                        w.latest_lsn,
                        w.timeline
                    );
                    if w.gaps.is_empty() {
                        println!("WAL gaps:    none");
                    } else {
                        println!(
                            "WAL gaps:    {} — WAL after a gap cannot be replayed",
                            w.gaps.join(", ")
                        );
                    }
                } else {
                    println!("Recoverable: unknown ({})", w.error);
                }
            }
            println!("Artifacts:");
            for a in manifest["artifacts"].as_array().into_iter().flatten() {
                println!(
                    "  {}  {}  raw {} sha256 {}  stored {} sha256 {}  {} part(s)",
                    s(&a["name"]),
                    s(&a["format"]),
                    output::bytes(a["raw_bytes"].as_u64().unwrap_or(0)),
                    s(&a["raw_sha256"]),
                    output::bytes(a["stored_bytes"].as_u64().unwrap_or(0)),
                    s(&a["stored_sha256"]),
                    a["parts"].as_u64().unwrap_or(0),
                );
            }
            Ok(())
        }
        format => output::print_structured(format, &manifest),
    }
}
