"""One plugin per modality, wrapping real models in the Process interface."""
