//! Following an operation's event stream: a progress bar on a terminal, plain lines otherwise.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use soma_proto::v1::{self, operation_event::Event};
use tonic::Streaming;

use crate::{
    error::CliError,
    output::{Layout, bytes, terminal_safe},
};

/// How often plain-text progress lines are printed when nothing else changes.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Consumes `stream` to its result, showing progress on stderr.
pub(crate) async fn follow(
    mut stream: Streaming<v1::OperationEvent>,
    operation: &'static str,
    addr: &str,
) -> Result<v1::OperationResult, CliError> {
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}").expect("valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last_phase = String::new();
    let mut last_print = Instant::now() - PLAIN_EVERY;
    let outcome = loop {
        match stream.next().await {
            Some(Ok(v1::OperationEvent {
                event: Some(Event::Progress(p)),
            })) => {
                let pct = if p.expected_raw_bytes > 0 {
                    format!(
                        " ({:.0}%)",
                        100.0 * p.raw_bytes as f64 / p.expected_raw_bytes as f64
                    )
                } else {
                    String::new()
                };
                let line = format!(
                    "{operation} {}: {} — raw {}{pct}, stored {}, {}/s{}",
                    p.operation_id,
                    p.phase,
                    bytes(p.raw_bytes),
                    bytes(p.stored_bytes),
                    bytes(p.raw_bytes_per_second as u64),
                    if p.message.is_empty() {
                        String::new()
                    } else {
                        format!(" — {}", p.message)
                    }
                );
                // Phase and message come from the agent: one inert line either way.
                let line = terminal_safe(&line, Layout::Line).into_owned();
                match &bar {
                    Some(bar) => bar.set_message(line),
                    None => {
                        if p.phase != last_phase || last_print.elapsed() >= PLAIN_EVERY {
                            eprintln!("{line}");
                            last_print = Instant::now();
                        }
                    }
                }
                last_phase = p.phase;
            }
            Some(Ok(v1::OperationEvent {
                event: Some(Event::Result(r)),
            })) => break Ok(r),
            Some(Ok(v1::OperationEvent { event: None })) => {}
            Some(Err(status)) => break Err(CliError::from_status(status, addr, operation)),
            None => {
                break Err(CliError::Lost {
                    operation,
                    detail: "the agent closed the stream without a result".into(),
                });
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    outcome
}
