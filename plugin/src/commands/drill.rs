//! `kubectl soma drill [ID|latest]`.

use soma_proto::v1;

use crate::{
    cli::{DrillArgs, OutputFormat},
    connect::Agent,
    error::CliError,
    output, progress,
};

/// Asks the agent to restore the backup into a scratch target and check it; prints the report
/// (`-o json`: the report document) and exits 1, naming why, when the drill did not pass.
pub(crate) async fn run(
    mut agent: Agent,
    out: OutputFormat,
    args: DrillArgs,
) -> Result<(), CliError> {
    let stream = agent
        .client
        .drill(v1::DrillRequest {
            backup_id: args.id,
            engine: args.engine.map_or(0, |e| e.to_proto() as i32),
        })
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let result = progress::follow(stream, "drill", &agent.addr).await?;
    let report = result.drill.ok_or_else(|| {
        CliError::Other(format!(
            "the agent at {} finished the drill without a report; upgrade the agent",
            agent.addr
        ))
    })?;
    let doc: serde_json::Value = serde_json::from_str(&report.report_json)
        .map_err(|e| CliError::Other(format!("the agent sent an unreadable drill report: {e}")))?;
    match out {
        OutputFormat::Table => {
            outln!("{}", result.summary);
            let rows: Vec<Vec<String>> = doc["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
                    let verdict = if c["skipped"].as_bool().unwrap_or(false) {
                        "skipped"
                    } else if c["passed"].as_bool().unwrap_or(false) {
                        "ok"
                    } else {
                        "FAILED"
                    };
                    vec![s("name"), verdict.into(), s("expected"), s("found")]
                })
                .collect();
            output::table(&["CHECK", "RESULT", "EXPECTED", "FOUND"], &rows);
            outln!(
                "RTO: {:.1} s (restore until the data was usable)",
                report.rto_seconds
            );
        }
        format => output::print_structured(format, &doc)?,
    }
    if report.passed {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "the drill of backup {} did not pass: {}",
            result.backup.map(|b| b.id).unwrap_or_default(),
            report.failure
        )))
    }
}
