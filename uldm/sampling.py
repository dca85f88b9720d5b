# TEMPORARY stand-in until the pipeline branch lands
def make_scheduler(name, config):
    import diffusers
    table = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
             "unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler"}
    return getattr(diffusers, table[name]).from_config(config)
