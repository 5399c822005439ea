"""After the search: the members trained on all data, their ensemble (soft vote, soup, test-time views), the
self-describing model folder and predictions. Ray-free; tuning/member_tasks.py dispatches the members."""
