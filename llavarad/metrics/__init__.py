"""Evaluation metrics for generated reports (evaluate.py): BLEU, ROUGE, CheXbert F1, RadGraph F1,
CheXprompt (the judge's prompt, parser and client), bootstrap confidence intervals and the report
files. Reads prediction files; never imports the model, inference, training or serving rooms."""
