//! Training LEGO: the two phases, the hard examples between them, and evaluation.
//!
//! ```text
//! phase 1   train a shallow model (exit_layer = num_layers) on all training batches
//!           [Trainer::train_with_early_stopping]
//! calibrate the threshold at which the target share of tokens is "hard" (validation split)
//!           [compute_confidence_threshold]
//! gate      (optional) fit the learned exit gate to imitate that routing from the exit state,
//!           its own threshold calibrated on validation           [train_exit_gate]
//! collect   the hard examples of the training split: lower hidden states + targets
//!           [collect_hard_examples, create_hard_example_loader]
//! phase 2   extend the model, freeze the lower part, train the upper layers on the hard
//!           examples only, from the cached hidden states
//!           [LegoTransformer::extend, Trainer::train_upper_layers_with_early_stopping]
//! gate'     (optional) fit CALM's consistency gate: does the exit's argmax equal the deep
//!           model's? keep it if its validation frontier is better
//!           [train_consistency_gate, validation_frontier_ppl]
//! evaluate  loss, PPL, accuracy and the early-exit statistics   [Trainer::evaluate]
//! ```
//!
//! What LEGO is compared with: the deep baseline trained from scratch, and that baseline with
//! a tuned exit head ([`tuned_exit_head`]: body frozen, a copy of its head trained at the exit
//! layer) [Trainer::tune_exit_head_with_early_stopping].

pub mod checkpoint;
pub mod exit_gate;
pub mod hard_examples;
pub mod trainer;
pub mod tuned_exit_head;
pub mod utils;

pub use checkpoint::{
    OptimizerState, TrainingCheckpoint, load_training_checkpoint, save_training_checkpoint,
};
pub use exit_gate::{
    ExitGateOptions, ExitGateReport, GateAgreement, GateFit, OneClass, compute_gate_threshold,
    gate_agreement, train_consistency_gate, train_exit_gate, validation_frontier_ppl,
};
pub use hard_examples::{
    HardBatch, HardExamples, Phase2Mode, collect_hard_examples, compute_confidence_threshold,
    create_hard_example_loader, evaluate_on_hard_examples,
};
pub use trainer::{EvalStats, History, Phase2History, TrainOptions, Trainer};
pub use tuned_exit_head::{ExitHeadEpoch, ExitHeadHistory};
pub use utils::{Device, get_device, set_seed};
