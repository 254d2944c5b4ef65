//! Logging set-up: `RUST_LOG` filters (default `info`), `LOG_FORMAT=json` for JSON lines.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, and sends panics to the log too ([`log_panics`]).
/// Safe to call more than once (later calls do nothing).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    log_panics();
}

/// Logs every panic as an error (its message and where it happened) before the
/// standard report on stderr. A panic in a task (a bug) ends that task only — a request,
/// a group-commit batch, a relay pass — and the process goes on; with `LOG_FORMAT=json`
/// its plain-text report on stderr would be missed by whatever reads the JSON lines.
/// Installed once however often it is called.
pub fn log_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(not a string)");
            let location = info.location().map(ToString::to_string).unwrap_or_default();
            tracing::error!(panic = message, location, "panicked");
            report(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// What a subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_panic_is_logged_as_an_error_with_its_message_and_place() {
        super::log_panics();
        super::log_panics();
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        // On a thread of its own, with the subscriber as its default: the hook runs on
        // the thread that panics.
        let joined = std::thread::spawn(move || {
            tracing::subscriber::with_default(subscriber, || panic!("injected for the test"))
        })
        .join();
        assert!(joined.is_err(), "the thread panicked");
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "logged once, though installed twice: {text}"
        );
        let line = &lines[0];
        assert_eq!(line["level"], "ERROR");
        assert_eq!(line["fields"]["message"], "panicked");
        assert_eq!(line["fields"]["panic"], "injected for the test");
        assert!(
            line["fields"]["location"]
                .as_str()
                .unwrap()
                .starts_with("src/telemetry.rs:"),
            "{line}"
        );
    }
}
