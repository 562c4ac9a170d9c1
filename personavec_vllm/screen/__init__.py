"""Vet training data with persona vectors before fine-tuning: the projection difference of each
sample (`score`), over a dataset read by `dataset`, resumable (`checkpoint`), with reports
(`report`); and the fine-tuning shift of a tuned model (`shift`)."""

from personavec_vllm.screen.dataset import Dataset, MalformedInputError, Sample, ScreenError, read_dataset, write_subset
from personavec_vllm.screen.report import FilterSpec
from personavec_vllm.screen.score import ScreenResult, ScreenSettings, load_hf, screen_dataset
from personavec_vllm.screen.shift import measure_shift, plot_shift, question_sets, shift_table, write_shift_outputs

__all__ = [
    "Dataset",
    "FilterSpec",
    "MalformedInputError",
    "Sample",
    "ScreenError",
    "ScreenResult",
    "ScreenSettings",
    "load_hf",
    "measure_shift",
    "plot_shift",
    "question_sets",
    "read_dataset",
    "screen_dataset",
    "shift_table",
    "write_shift_outputs",
    "write_subset",
]
