"""cosmicai: Cloud-based Astronomy Inference (CAI).

Run a pre-trained astronomy foundation model (first: AstroMAE redshift regression) over large galaxy
datasets, fanned out over local processes, a Dask cluster or AWS Lambda, in three stages:
plan -> infer -> summarize (see ``cosmicai.pipeline``).
"""

__version__ = "0.1.0"
