"""Probe: top-N value readout renormalised over the selection (what the runtime does) vs the same plus the
unselected rows' mean value weighted by the unselected probability mass (needs a resident per-head value sum).

    python bench/kcache_residual_probe.py

Relative error ||O_N - O|| / ||O|| of the attention output of the last 32 queries of 2 calibration samples
(the shipped self-instruct text, 2048 tokens), per layer, for N in 64/128/256/512; prints the mean over layers.
"""
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.models import load_model
from calibrate.recipe import resolve_recipe
from calibrate.data import build_calibration_set
from calibrate.collect import run_calibration_pass
torch.set_num_threads(1)
rec=resolve_recipe("smollm2-135m")
lm=load_model(rec,progress=False); model,tok=lm.model,lm.tokenizer
data=build_calibration_set(tok,rec,progress=False)
GRID=[64,128,256,512]
err={"renorm":torch.zeros(30,4),"resid":torch.zeros(30,4)}; norm=torch.zeros(30)
class Obs:
    def observe(self,l,q,k,v,s):
        T=q.shape[2]; c=32
        qq=q[0,:,T-c:].float(); kk=k[0].float(); vv=v[0].float()
        nkv=kk.shape[0]; G=qq.shape[0]//nkv
        logits=(qq.reshape(nkv,G*c,-1)@kk.transpose(-1,-2)).view(nkv,G,c,T)*s
        pos=torch.arange(T-c,T); vis=torch.arange(T)[None,:]<=pos[:,None]
        p=torch.softmax(logits.masked_fill(~vis,-float('inf')),-1)
        flat=p.view(nkv,G*c,T)
        exact=flat@vv
        score=p.sum(1).masked_fill(~vis,-1)
        order=score.argsort(-1,descending=True); rank=torch.empty_like(order).scatter_(-1,order,torch.arange(T).expand_as(order))
        norm[l]+= (exact**2).sum()
        csum=(vv[:,None,:,:]*vis[None,:,:,None]).sum(2)  # [H,c,d] sum of visible values
        cnt=vis.sum(1).float()  # [c]
        for i,n in enumerate(GRID):
            sel=(rank<n)  # [H,c,T]
            kept=(p*sel[:,None]).view(nkv,G*c,T)
            mass=kept.sum(-1,keepdim=True)
            a=kept@vv
            err["renorm"][l,i]+=((a/mass-exact)**2).sum()
            selsum=(sel.float()@vv)  # [H,c,d]
            rest=(csum-selsum)/(cnt[None,:,None]-n).clamp(min=1)
            rest=rest[:,None].expand(nkv,G,c,-1).reshape(nkv,G*c,-1)
            err["resid"][l,i]+=((a+(1-mass)*rest-exact)**2).sum()
    def end_sample(self): pass
run_calibration_pass(model,data.samples[:2],[Obs()])
for k in err:
    e=(err[k]/norm[:,None]).sqrt()
    print(k, "mean over layers", e.mean(0).tolist())
    print(k, "layers 0-5", e[:6].tolist())
