"""Private VFER training on Flower with privfer's DP-SGD clients and secure aggregation."""
