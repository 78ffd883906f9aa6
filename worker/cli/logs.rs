//! Log set-up for every command: stderr, text escaped or JSON, and a filter that keeps
//! libraries which copy mail content into their debug events at `warn`.

use crate::config::{Config, LogFormat};

/// Libraries whose debug and trace events copy mail content: html5ever (through the `log`
/// bridge) logs every token and text node the sanitiser parses, 100 times the mail's size.
/// They are held at `warn` whatever the level, unless the filter names them itself.
const CONTENT_COPYING_TARGETS: [&str; 2] = ["html5ever", "markup5ever"];

/// The log filter: `RUST_LOG`, else `level`, with [`CONTENT_COPYING_TARGETS`] capped at `warn`
/// unless the filter mentions them.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let named = filter.to_string();
    for target in CONTENT_COPYING_TARGETS {
        if !named.contains(target)
            && let Ok(directive) = format!("{target}=warn").parse()
        {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Logs go to stderr. `run` (the service) logs at the settings' level in the settings' format;
/// the interactive commands log text, warnings only unless RUST_LOG says otherwise. Text logs
/// escape every field value ([`crate::display::EscapedFields`]): error text may quote a
/// server. JSON needs no help (control characters are escaped by the JSON encoder).
pub(super) fn init_logs(config: &Config, interactive: bool) {
    let (level, format) = if interactive {
        ("warn", LogFormat::Text)
    } else {
        (config.log.level.as_str(), config.log.format)
    };
    // Colours only on a terminal: escape codes in a journal or a log file get in the way of
    // anyone searching it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(level))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.fmt_fields(crate::display::EscapedFields).init(),
    }
}
