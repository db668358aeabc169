"""bprop"""
