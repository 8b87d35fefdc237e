"""Integrations with the libraries users train with. They follow those libraries' releases
(TRL pins a minor version), so they live apart from the kernels and the loss."""
