"""ray_jobs"""
