"""Datasets: few-shot (episodes) and supervised."""
