//! What a layer is: its shape and rules ([`config`]), the router ([`router`]), where experts
//! live ([`placement`]), its weights ([`weights`]), packed weight formats ([`quant`]), the checkpoint families ([`families`])
//! and the files they come in ([`checkpoint`]).

pub mod checkpoint;
pub mod config;
pub mod families;
pub mod placement;
pub mod quant;
pub mod router;
pub mod weights;
