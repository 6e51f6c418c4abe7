"""Report-generation metrics: BLEU, ROUGE, CheXbert F1, RadGraph F1, bootstrap CIs."""
