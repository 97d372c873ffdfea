//! `awq inspect MODEL`: open and check a checkpoint, print a summary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use awq_model::Checkpoint;
use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let ck = Checkpoint::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    let c = ck.config();
    let params: usize = (0..c.n_blocks).map(|b| ck.block_elements_of(b)).sum::<usize>()
        + c.vocab_size * c.hidden_size * if c.tie_word_embeddings { 1 } else { 2 };
    let summary = json!({
        "model_type": c.model_type,
        "blocks": c.n_blocks,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tied_embeddings": c.tie_word_embeddings,
        "dtype": c.dtype.map(|d| d.to_string()),
        "parameters": params,
        "experts": c.moe.as_ref().map(|m| m.n_experts),
        "experts_per_token": c.moe.as_ref().map(|m| m.experts_per_token),
        "sparse_blocks": c.moe.as_ref().map(|_| (0..c.n_blocks).filter(|&b| ck.arch().is_sparse(c, b)).count()),
    });
    if args.json {
        out!("{summary}");
    } else {
        out!(
            "{}: {} blocks, hidden {}, intermediate {}, {} heads / {} kv heads of {}, vocab {}, {:.1}M parameters (linears, norms and embeddings), dtype {}",
            c.model_type,
            c.n_blocks,
            c.hidden_size,
            c.intermediate_size,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab_size,
            params as f64 / 1e6,
            c.dtype.map_or("unspecified".to_string(), |d| d.to_string())
        );
        if let Some(m) = &c.moe {
            let sparse = (0..c.n_blocks).filter(|&b| ck.arch().is_sparse(c, b)).count();
            out!(
                "mixture of experts: {} experts of width {}, {} per token, in {sparse} of {} blocks",
                m.n_experts,
                m.expert_intermediate_size,
                m.experts_per_token,
                c.n_blocks
            );
        }
        out!("checked: every tensor present with the shape and dtype config.json implies");
    }
    Ok(())
}
