"""The client side: ``run`` on a store, ``attention`` on tensors, clusters."""
