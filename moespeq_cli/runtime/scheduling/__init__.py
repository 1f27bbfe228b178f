"""What moves when: the offloading policies, the ELB scheduler, the speculative governor."""
