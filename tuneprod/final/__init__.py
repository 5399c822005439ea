"""After the search: the members trained on all data, their ensemble (soft vote, soup, test-time views), the
self-describing model folder and predictions. Ray-free; tuning/final_tasks.py runs it on the cluster (members and
prediction shards as Ray tasks)."""
