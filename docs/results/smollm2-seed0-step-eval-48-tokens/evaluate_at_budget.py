import json, sys, time
from steptune.evaluation.eval import EvalConfig, evaluate
cfg = json.load(open('/work/runs/study-smollm2/seed-0/eval/step/config.json'))
if __name__ == "__main__":
    ids = [i.split(':', 1)[1] for i in json.load(open('/tmp/ids16.json'))]
    budget = int(sys.argv[1])
    cfg.update(out=f'/work/runs/step-budget-{budget}', max_new_tokens=budget, tasks=ids, processes=2, name=f'step-{budget}')
    t = time.time()
    s = evaluate(EvalConfig.model_validate(cfg), progress=False)
    print(budget, round(time.time() - t, 1), 's', json.dumps({k: s[k] for k in s if k in ('success_rate', 'n_episodes')}))
    