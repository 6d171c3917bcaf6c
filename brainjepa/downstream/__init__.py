"""Downstream evaluation of Brain-JEPA: fine-tuning, linear probing and connectivity baselines on labelled
tasks (classification and regression), held to shared splits across sites and cohorts, with metrics,
mean +- std summaries over seeds, Markdown tables and PNG plots in the shape of the Brain-JEPA paper's."""
