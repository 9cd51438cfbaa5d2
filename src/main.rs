//! The `cardvault` command: serve, migrate, merchant, hsm, keys and audit
//! administration.
//! Thin by design: everything it runs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use cardvault::config::Config;
use cardvault::server::{bootstrap, shutdown_signal, Application};

/// jemalloc instead of glibc's allocator: under load glibc's `malloc`,
/// `free` and their consolidation of free chunks took about 15% of the
/// server's CPU (perf, reveal on SQLite).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "cardvault", version, about = "Self-hosted card-data vault")]
struct Cli {
    /// TOML configuration file. Without one, dev mode: ./data, SoftHSM token
    /// and self-signed certificate created on first start.
    #[arg(long, global = true, env = "CARDVAULT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the TLS API.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Merchant administration.
    Merchant {
        #[command(subcommand)]
        command: MerchantCommand,
    },
    /// HSM administration.
    Hsm {
        #[command(subcommand)]
        command: HsmCommand,
    },
    /// Key rotation and re-encryption (online: the API may keep serving).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Audit trail verification and the compliance report.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// New KEK version in the HSM; re-wrap every system data key under it,
    /// retire the old KEK and destroy it once nothing references it. With
    /// --merchant / --all-merchants, rotate merchant wrapping keys instead.
    RotateKek {
        #[arg(long, conflicts_with = "all_merchants")]
        merchant: Option<String>,
        #[arg(long)]
        all_merchants: bool,
    },
    /// New data keys for new seals (all owners, or one merchant); the old
    /// ones are retired. Run `keys reencrypt` afterwards.
    RotateDek {
        #[arg(long)]
        merchant: Option<String>,
    },
    /// Re-seal every card still under a retired data key with the newest
    /// key, in batches. Resumable and idempotent.
    Reencrypt {
        #[arg(long, default_value_t = 500)]
        batch: u32,
        /// Stop after this many cards.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Enforce cryptoperiods once (a serving node does this on its own).
    Maintain,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain and the HSM-signed checkpoints; report the first
    /// entry edited, deleted, inserted or reordered and exit non-zero.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Sign a checkpoint over the chain head now.
    Checkpoint,
    /// Write the PCI DSS evidence report; exits non-zero when a check fails.
    Report {
        #[arg(long, value_enum, default_value_t = ReportFormat::Html)]
        format: ReportFormat,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Json,
    Html,
}

#[derive(Subcommand)]
enum MerchantCommand {
    /// Create a merchant and print its keys once.
    Create {
        #[arg(long)]
        name: String,
        /// Give the secret key the cards:reveal scope.
        #[arg(long)]
        reveal: bool,
        /// Print JSON (the default output is JSON too; the flag is accepted
        /// for scripts that state it).
        #[arg(long)]
        json: bool,
    },
    /// Crypto-shred a merchant: destroy its HSM keys (its ciphertext can
    /// never be opened again, backups included), then delete its rows.
    Delete {
        /// Required: deleting rows without shredding would leave readable
        /// ciphertext in backups.
        #[arg(long)]
        shred: bool,
        id: String,
    },
    /// Revoke an API key (`key_…`).
    RevokeKey { key_id: String },
}

#[derive(Subcommand)]
enum HsmCommand {
    /// Create the token's keys (the KEK) if they do not exist.
    Init,
}

/// The actor operator commands are audited as.
const OPERATOR: &str = "operator";

async fn keys_command(cfg: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let vault = bootstrap::vault(cfg).await?;
    let bar = progress::Bar::default();
    let err = |e: cardvault::service::ServiceError| anyhow::anyhow!("{e}");
    match command {
        KeysCommand::RotateKek {
            merchant,
            all_merchants,
        } => {
            let grace = std::time::Duration::from_secs(cfg.keys.destroy_grace_secs);
            let out = if all_merchants {
                vault
                    .rotate_all_merchant_keys(OPERATOR, &bar, grace)
                    .await
                    .map_err(err)?
            } else {
                vec![vault
                    .rotate_wrapping_key(merchant.as_deref(), OPERATOR, &bar, grace)
                    .await
                    .map_err(err)?]
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        KeysCommand::RotateDek { merchant } => {
            let out = vault
                .rotate_data_keys(merchant.as_deref(), OPERATOR)
                .await
                .map_err(err)?;
            println!(
                "rotated {} data keys; run `cardvault keys reencrypt` to move old records",
                out.len()
            );
        }
        KeysCommand::Reencrypt { batch, limit } => {
            let n = vault
                .reencrypt(batch.clamp(1, 10_000), limit, OPERATOR, &bar)
                .await
                .map_err(err)?;
            println!("re-encrypted {n} cards");
        }
        KeysCommand::Maintain => {
            let n = vault.key_maintenance(&cfg.keys).await.map_err(err)?;
            println!("rotated {n} data keys past their cryptoperiod");
        }
    }
    Ok(())
}

async fn audit_command(cfg: &Config, command: AuditCommand) -> anyhow::Result<()> {
    let vault = bootstrap::vault(cfg).await?;
    let err = |e: cardvault::service::ServiceError| anyhow::anyhow!("{e}");
    match command {
        AuditCommand::Verify { json } => {
            let v = vault.verify_audit(OPERATOR).await.map_err(err)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(first) = v.findings.first() {
                println!(
                    "TAMPERED: {} (first of {} findings)",
                    first.message,
                    v.findings.len()
                );
            } else {
                println!(
                    "audit trail intact: {} entries ({} chained, {} before the chain), {} checkpoints",
                    v.entries, v.chained, v.unchained, v.checkpoints
                );
            }
            if !v.ok() {
                anyhow::bail!(
                    "audit trail verification failed at seq {}",
                    v.findings[0].seq
                );
            }
        }
        AuditCommand::Checkpoint => match vault.checkpoint().await.map_err(err)? {
            Some(seq) => println!("checkpoint over seq {seq}"),
            None => println!("audit log is empty"),
        },
        AuditCommand::Report { format, out } => {
            let report = cardvault::report::build(&vault, cfg).await.map_err(err)?;
            let body = match format {
                ReportFormat::Json => serde_json::to_string_pretty(&report)?,
                ReportFormat::Html => cardvault::report::html(&report),
            };
            std::fs::write(&out, body).with_context(|| format!("write {}", out.display()))?;
            println!(
                "{} ({} of {} checks pass) written to {}",
                report.summary.verdict,
                report.summary.passed,
                report.summary.total,
                out.display()
            );
            if report.summary.failed > 0 {
                anyhow::bail!("{} checks failed", report.summary.failed);
            }
        }
    }
    Ok(())
}

mod progress {
    //! A minimal progress bar on stderr (redrawn in place on a terminal,
    //! one line per 10% otherwise).
    use std::io::{IsTerminal, Write};
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Bar(Mutex<(String, u64, u64, u64)>);

    fn draw(what: &str, done: u64, total: u64) {
        let width = 30u64;
        let filled = (done * width)
            .checked_div(total)
            .unwrap_or(width)
            .min(width);
        let bar: String = (0..width)
            .map(|i| if i < filled { '#' } else { '-' })
            .collect();
        let mut err = std::io::stderr();
        if err.is_terminal() {
            let _ = write!(err, "\r{what:<24} [{bar}] {done}/{total}");
        } else {
            let _ = writeln!(err, "{what:<24} [{bar}] {done}/{total}");
        }
    }

    impl cardvault::service::keys::Progress for Bar {
        fn start(&self, what: &str, total: u64) {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            *s = (what.to_string(), 0, total, 0);
            draw(what, 0, total);
        }
        fn advance(&self, n: u64) {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            s.1 += n;
            let step = (s.2 / 10).max(1);
            if std::io::stderr().is_terminal() || s.1 / step != s.3 / step {
                draw(&s.0, s.1, s.2.max(s.1));
                s.3 = s.1;
            }
        }
        fn finish(&self) {
            let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            draw(&s.0, s.1, s.2.max(s.1));
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
        }
    }
}

/// Logs go to stderr through a thread of their own: a request formats its
/// line and queues it; the thread writes what has queued in one buffered
/// write. (Written directly, every access-log line was a `write` syscall
/// under stderr's lock on a runtime thread: about a tenth of the server's
/// CPU at load.) Nothing is dropped: when the queue is full, loggers wait.
/// The returned guard flushes the queue when dropped.
fn init_tracing(cfg: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("cardvault-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only for a person at a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardvault: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The server's runtime, or an offline command's. An offline command does
/// one thing at a time, so its blocking work (the audit report's column
/// scans, the audit walk's pages) gets one thread: spread over the several
/// threads tokio would otherwise start, each kept its own allocator caches,
/// and the SQLite report's peak RSS was 40–47 MiB in about half the runs
/// instead of 31 (BENCHMARKS.md, item 49).
fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if !matches!(command, Command::Serve) {
        rt.max_blocking_threads(1);
    }
    rt.enable_all().build()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    // Before any thread exists (the log writer is one): SoftHSM reads its
    // environment at C_Initialize.
    bootstrap::prepare_process(&cfg)?;
    let _log_flush = init_tracing(&cfg);
    let rt = runtime(&cli.command).context("start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve => {
                let stop = shutdown_signal().context("install signal handlers")?;
                let app = Application::build(cfg.clone()).await?;
                let addr = app.local_addr()?;
                tracing::info!(
                    %addr,
                    mode = cfg.crypto.mode.as_str(),
                    database = %app.vault().storage().backend(),
                    dev = cfg.dev,
                    "cardvault listening on https://{addr}"
                );
                app.run_until_stopped(stop).await
            }
            Command::Migrate => {
                bootstrap::storage(&cfg).await?;
                println!("migrations applied");
                Ok(())
            }
            Command::Merchant {
                command:
                    MerchantCommand::Create {
                        name,
                        reveal,
                        json: _,
                    },
            } => {
                let vault = bootstrap::vault(&cfg).await?;
                let created = vault
                    .create_merchant(&name, reveal)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("{}", serde_json::to_string_pretty(&created)?);
                Ok(())
            }
            Command::Merchant {
                command: MerchantCommand::Delete { shred, id },
            } => {
                if !shred {
                    anyhow::bail!("refusing to delete without --shred: rows alone would leave the merchant's ciphertext readable in backups");
                }
                let vault = bootstrap::vault(&cfg).await?;
                let out = vault.shred_merchant(&id, OPERATOR).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(())
            }
            Command::Merchant {
                command: MerchantCommand::RevokeKey { key_id },
            } => {
                let vault = bootstrap::vault(&cfg).await?;
                vault.revoke_api_key(&key_id, OPERATOR).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("revoked {key_id}");
                Ok(())
            }
            Command::Keys { command } => keys_command(&cfg, command).await,
            Command::Audit { command } => audit_command(&cfg, command).await,
            Command::Hsm { command: HsmCommand::Init } => {
                bootstrap::vault(&cfg).await?;
                println!("HSM keys ready ({})", cfg.crypto.kek_label);
                Ok(())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    /// The threads that ran `n` blocking tasks spawned at once.
    fn blocking_threads(rt: &tokio::runtime::Runtime, n: usize) -> HashSet<std::thread::ThreadId> {
        rt.block_on(async {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    tokio::task::spawn_blocking(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        std::thread::current().id()
                    })
                })
                .collect();
            let mut ids = HashSet::new();
            for t in tasks {
                ids.insert(t.await.unwrap_or_else(|e| panic!("blocking task: {e}")));
            }
            ids
        })
    }

    #[test]
    fn offline_commands_run_blocking_work_on_one_thread() {
        let offline = runtime(&Command::Migrate).unwrap_or_else(|e| panic!("runtime: {e}"));
        assert_eq!(blocking_threads(&offline, 4).len(), 1);
        let server = runtime(&Command::Serve).unwrap_or_else(|e| panic!("runtime: {e}"));
        assert!(blocking_threads(&server, 4).len() > 1);
    }
}
