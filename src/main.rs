//! The `cardvault` command: serve, migrate, merchant and hsm administration.
//! Thin by design: everything it runs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use cardvault::config::Config;
use cardvault::server::{bootstrap, shutdown_signal, Application};

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
}

#[derive(Subcommand)]
enum HsmCommand {
    /// Create the token's keys (the KEK) if they do not exist.
    Init,
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    init_tracing(&cfg);
    // Before any thread exists: SoftHSM reads its environment at C_Initialize.
    bootstrap::prepare_process(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve => {
                let app = Application::build(cfg.clone()).await?;
                let addr = app.local_addr()?;
                tracing::info!(
                    %addr,
                    mode = cfg.crypto.mode.as_str(),
                    database = %app.vault().storage().backend(),
                    dev = cfg.dev,
                    "cardvault listening on https://{addr}"
                );
                app.run_until_stopped(shutdown_signal()).await
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
            Command::Hsm {
                command: HsmCommand::Init,
            } => {
                bootstrap::vault(&cfg).await?;
                println!("HSM keys ready ({})", cfg.crypto.kek_label);
                Ok(())
            }
        }
    })
}
