"""`pagedserve tune`: search engine settings for the highest goodput under the SLOs (search.py),
measured by replaying a workload (workload.py) through an in-process engine (replay.py)."""
