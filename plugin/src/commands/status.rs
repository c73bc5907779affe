//! `kubectl soma status`: what the agent is and does.

use serde_json::json;
use soma_proto::v1;

use crate::{cli::OutputFormat, connect::Agent, error::CliError};

/// Shows the agent's version, engines, store and running jobs.
pub async fn run(mut agent: Agent, out: OutputFormat) -> Result<(), CliError> {
    let info = agent
        .client
        .get_info(v1::GetInfoRequest {})
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let engines: Vec<_> = info
        .engines
        .iter()
        .map(|e| {
            json!({
                "engine": v1::Engine::try_from(e.engine).unwrap_or(v1::Engine::Unspecified).short_name(),
                "target": e.target,
            })
        })
        .collect();
    let jobs: Vec<_> = info
        .running_jobs
        .iter()
        .map(|j| json!({"id": j.id, "operation": j.operation, "target": j.target, "started_at": j.started_at}))
        .collect();
    match out {
        OutputFormat::Table => {
            println!("Agent:    {} (version {})", agent.addr, info.agent_version);
            println!("Store:    {}", info.store);
            for e in &engines {
                println!(
                    "Engine:   {} {}",
                    e["engine"].as_str().unwrap_or(""),
                    e["target"].as_str().unwrap_or("")
                );
            }
            if jobs.is_empty() {
                println!("Jobs:     none running");
            }
            for j in &jobs {
                println!(
                    "Job:      {} {} ({}) since {}",
                    j["operation"].as_str().unwrap_or(""),
                    j["target"].as_str().unwrap_or(""),
                    j["id"].as_str().unwrap_or(""),
                    j["started_at"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        format => crate::output::print_structured(
            format,
            &json!({
                "agent": agent.addr,
                "agent_version": info.agent_version,
                "store": info.store,
                "engines": engines,
                "running_jobs": jobs,
            }),
        ),
    }
}
