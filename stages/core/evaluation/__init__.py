"""Evaluation: embedding loops, exact search (faiss, certified set search), retrieval and cross-modal
metrics, NMI, and the PNG reports."""
