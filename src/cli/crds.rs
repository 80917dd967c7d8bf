//! `wiremesh crds`: the CustomResourceDefinitions generated from the wire types.

use std::path::PathBuf;

use wiremesh_core::wire;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  wiremesh crds | kubectl apply -f -
  wiremesh crds --dir crds/            (what CI compares with the committed crds/)")]
pub struct CrdsArgs {
    /// Write `<plural>.projectcalico.org.yaml` files into this directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn run(args: &CrdsArgs) -> Result<(), wire::ApiError> {
    match &args.dir {
        Some(dir) => {
            for path in wire::write_all(dir)? {
                crate::outln!("wrote {}", path.display());
            }
        }
        None => {
            let yaml: Vec<String> = wire::rendered()?.into_iter().map(|(_, y)| y).collect();
            crate::out!("{}", yaml.join("---\n"));
        }
    }
    Ok(())
}
