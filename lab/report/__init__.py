"""torch-free reports from experiments/: load, tables, frames, sections, figures, plots, render."""
