"""Training side: the routing-data contract, importers, tags, labels, the router model, training and evaluation."""
