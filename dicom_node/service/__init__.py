"""Service: what runs beside the stages to operate the node.

Status pages and metrics, previews, logging, retention, the supervisor of child processes,
and the embedded PACS with its viewer.
"""
