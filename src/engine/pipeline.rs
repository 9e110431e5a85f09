//! The pipeline as data: `pipeline.toml` (stages, kinds, inputs, params) plus a profile
//! (`profiles/<name>.toml`, overrides only) plus `--set STAGE.PARAM=VALUE` overrides.
//!
//! Everything is validated before the store is touched; every mistake (malformed TOML, unknown
//! stage, kind or parameter, a type change, a cycle) is a [`ConfigError`] naming the file and
//! the line and column, and the CLI exits with status 2.
//!
//! ```toml
//! [pipeline]
//! seed = 0
//!
//! [[stage]]
//! name = "report"
//! kind = "report"
//! inputs = ["mnist", "fashion_mnist?"]   # "stage", "stage/output"; "?" = optional
//! files = ["paper/templates"]             # repository files whose content is in the key
//! export = "report"                       # outputs are copied to artifacts/report/
//! params = { profile = "cpu" }
//!
//! [[stage]]
//! name = "ablation"
//! kind = "ablation"
//! profiles = ["ablation"]                 # exists only in these profiles (default: all)
//! [stage.resources]                       # what a cluster job asks for (`--executor slurm`)
//! cpus = 2
//! mem = "4G"
//! time = "01:00:00"
//! ```
//!
//! A profile overrides resources per stage under `[resources.<stage>]`, field by field.
//! Resources are not part of any key: they change where a stage runs, never its bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::params::{Param, Params};
use super::stage::Registry;

/// A mistake in the pipeline description or its overrides (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:column`, or the offending command-line argument.
    pub location: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// One declared input of a stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputRef {
    pub stage: String,
    /// `None` reads every output of the stage.
    pub output: Option<String>,
    /// An optional input may be skipped upstream; the stage then runs without it.
    pub optional: bool,
}

/// One stage, with its final parameters (pipeline, then profile, then `--set`).
#[derive(Clone, Debug)]
pub struct Stage {
    pub name: String,
    pub kind: String,
    pub doc: String,
    pub inputs: Vec<InputRef>,
    pub files: Vec<String>,
    pub export: Option<String>,
    pub params: Params,
    pub seed: u64,
    /// Where each parameter got its final value (`file:line:column` or `--set ...`), so that a
    /// bad value is reported where the user wrote it.
    pub origins: BTreeMap<String, String>,
    /// Where the stage is declared (`file:line:column`).
    pub declared_at: String,
    /// What a cluster job for this stage asks for (pipeline, then profile).
    pub resources: Resources,
}

/// What one stage's cluster job asks the scheduler for; `None` leaves the cluster's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (`sbatch --cpus-per-task`).
    pub cpus: Option<u32>,
    /// Memory, in Slurm's notation: "4G", "500M" (`sbatch --mem`).
    pub mem: Option<String>,
    /// GPUs (`sbatch --gpus`).
    pub gpus: Option<u32>,
    /// Wall-time limit, in Slurm's notation: "30", "02:00:00", "1-00:00:00" (`sbatch --time`).
    pub time: Option<String>,
}

impl Resources {
    /// `self` with every field `other` sets replaced.
    fn overridden_by(&self, other: &Resources) -> Resources {
        Resources {
            cpus: other.cpus.or(self.cpus),
            mem: other.mem.clone().or_else(|| self.mem.clone()),
            gpus: other.gpus.or(self.gpus),
            time: other.time.clone().or_else(|| self.time.clone()),
        }
    }
}

/// A validated pipeline: stages in a topological order (declaration order where free).
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub file: PathBuf,
    /// The directory `files` entries are relative to: the parent of the pipeline directory.
    pub root: PathBuf,
    /// `[pipeline] description`.
    pub description: String,
    pub profile: String,
    pub profile_description: String,
    pub stages: Vec<Stage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    #[serde(default)]
    pipeline: PipelineMeta,
    #[serde(default)]
    stage: Vec<StageDecl>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PipelineMeta {
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageDecl {
    name: Spanned<String>,
    kind: Spanned<String>,
    #[serde(default)]
    doc: String,
    #[serde(default)]
    inputs: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<String>>,
    #[serde(default)]
    export: Option<String>,
    /// Profiles the stage exists in (empty: all). A stage outside the active profile is
    /// dropped; an optional input naming it is dropped with it, a required one is an error.
    #[serde(default)]
    profiles: Vec<Spanned<String>>,
    #[serde(default)]
    params: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    #[serde(default)]
    resources: Resources,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    #[serde(default)]
    profile: ProfileMeta,
    #[serde(default)]
    params: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
    /// `[resources.<stage>]`: per-stage overrides of the pipeline's `[stage.resources]`.
    #[serde(default)]
    resources: BTreeMap<Spanned<String>, Resources>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProfileMeta {
    #[serde(default)]
    description: String,
    #[serde(default)]
    expected_runtime: String,
}

/// Turns byte offsets into `file:line:column` for error messages.
struct Located<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn at(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}:{line}:{column}", self.file.display())
    }

    fn err(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            location: self.at(offset),
            message: message.into(),
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            self.err(offset, format!("malformed TOML: {}", e.message()))
        })
    }
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError {
        location: file.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

fn one_of<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// The profiles available next to a pipeline file (`profiles/*.toml`), sorted.
pub fn available_profiles(pipeline_file: &Path) -> Vec<String> {
    let dir = pipeline_file
        .parent()
        .unwrap_or(Path::new("."))
        .join("profiles");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

impl Pipeline {
    /// Loads and validates `file` with the profile `profile` and the `--set` overrides: the
    /// DAG, and every stage's parameters through its kind's typed params (from `registry`).
    pub fn load(
        file: &Path,
        profile: &str,
        sets: &[String],
        registry: &Registry,
    ) -> Result<Pipeline, ConfigError> {
        let kinds = &registry.names();
        let text = read(file)?;
        let src = Located { file, text: &text };
        let decl: PipelineFile = src.parse()?;

        let mut stages: Vec<Stage> = Vec::new();
        let mut spans: HashMap<String, usize> = HashMap::new();
        for s in &decl.stage {
            let name = s.name.get_ref().clone();
            if name.is_empty() || name.contains(['/', '?', '.']) {
                return Err(src.err(
                    s.name.span().start,
                    format!("stage name {name:?} must be non-empty and contain no '/', '?' or '.'"),
                ));
            }
            if spans.insert(name.clone(), s.name.span().start).is_some() {
                return Err(src.err(
                    s.name.span().start,
                    format!("stage {name:?} is declared twice"),
                ));
            }
            if !kinds.contains(&s.kind.get_ref().as_str()) {
                return Err(src.err(
                    s.kind.span().start,
                    format!(
                        "stage {name:?}: unknown kind {:?}; valid kinds: {}",
                        s.kind.get_ref(),
                        one_of(kinds.iter().copied())
                    ),
                ));
            }
            let mut params = Params::new();
            let mut origins = BTreeMap::new();
            for (key, value) in &s.params {
                let param = Param::from_toml(value.get_ref())
                    .map_err(|m| src.err(value.span().start, m))?;
                params.insert(key.get_ref().clone(), param);
                origins.insert(key.get_ref().clone(), src.at(key.span().start));
            }
            let seed = match params.get("seed") {
                Some(Param::Int(seed)) if *seed >= 0 => *seed as u64,
                Some(_) => {
                    return Err(src.err(
                        s.name.span().start,
                        format!("stage {name:?}: param `seed` must be a non-negative integer"),
                    ))
                }
                None => decl.pipeline.seed,
            };
            stages.push(Stage {
                name,
                kind: s.kind.get_ref().clone(),
                doc: s.doc.clone(),
                inputs: Vec::new(),
                files: s.files.iter().map(|f| f.get_ref().clone()).collect(),
                export: s.export.clone(),
                params,
                seed,
                origins,
                declared_at: src.at(s.name.span().start),
                resources: s.resources.clone(),
            });
        }
        let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
        for (stage, s) in stages.iter_mut().zip(&decl.stage) {
            for input in &s.inputs {
                let text = input.get_ref();
                let (body, optional) = match text.strip_suffix('?') {
                    Some(body) => (body, true),
                    None => (text.as_str(), false),
                };
                let (up, output) = match body.split_once('/') {
                    Some((up, out)) => (up, Some(out.to_string())),
                    None => (body, None),
                };
                if !names.iter().any(|n| n == up) {
                    return Err(src.err(
                        input.span().start,
                        format!("stage {:?}: input {text:?} names unknown stage {up:?}; valid stages: {}", stage.name, one_of(names.iter().map(String::as_str))),
                    ));
                }
                stage.inputs.push(InputRef {
                    stage: up.to_string(),
                    output,
                    optional,
                });
            }
        }

        let order = topological_order(&stages).map_err(|cycle| {
            src.err(
                spans[&cycle[0]],
                format!("the stages form a cycle: {}", cycle.join(" -> ")),
            )
        })?;
        let mut by_name: HashMap<String, Stage> =
            stages.into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut stages: Vec<Stage> = order
            .iter()
            .map(|n| by_name.remove(n).expect("ordered names exist"))
            .collect();

        // Profile: overrides only, of parameters the pipeline declares.
        let profile_file = file
            .parent()
            .unwrap_or(Path::new("."))
            .join("profiles")
            .join(format!("{profile}.toml"));
        if !profile_file.is_file() {
            return Err(ConfigError {
                location: format!("--profile {profile}"),
                message: format!(
                    "no profile file {}; valid profiles: {}",
                    profile_file.display(),
                    one_of(available_profiles(file).iter().map(String::as_str))
                ),
            });
        }
        let profile_text = read(&profile_file)?;
        let psrc = Located {
            file: &profile_file,
            text: &profile_text,
        };
        let pdecl: ProfileFile = psrc.parse()?;
        for (stage_name, overrides) in &pdecl.params {
            let Some(stage) = stages.iter_mut().find(|s| &s.name == stage_name.get_ref()) else {
                return Err(psrc.err(
                    stage_name.span().start,
                    format!(
                        "unknown stage {:?}; valid stages: {}",
                        stage_name.get_ref(),
                        one_of(names.iter().map(String::as_str))
                    ),
                ));
            };
            for (param, value) in overrides {
                let new = Param::from_toml(value.get_ref())
                    .map_err(|m| psrc.err(value.span().start, m))?;
                override_param(stage, param.get_ref(), new)
                    .map_err(|m| psrc.err(param.span().start, m))?;
                stage
                    .origins
                    .insert(param.get_ref().clone(), psrc.at(param.span().start));
            }
        }

        for (stage_name, resources) in &pdecl.resources {
            let Some(stage) = stages.iter_mut().find(|s| &s.name == stage_name.get_ref()) else {
                return Err(psrc.err(
                    stage_name.span().start,
                    format!(
                        "[resources]: unknown stage {:?}; valid stages: {}",
                        stage_name.get_ref(),
                        one_of(names.iter().map(String::as_str))
                    ),
                ));
            };
            stage.resources = stage.resources.overridden_by(resources);
        }

        // `--set STAGE.PARAM=VALUE`, last word.
        for set in sets {
            let located = |message: String| ConfigError {
                location: format!("--set {set}"),
                message,
            };
            let (target, value) = set
                .split_once('=')
                .ok_or_else(|| located("expected STAGE.PARAM=VALUE".to_string()))?;
            let (stage_name, param) = target
                .split_once('.')
                .ok_or_else(|| located("expected STAGE.PARAM=VALUE".to_string()))?;
            let Some(stage) = stages.iter_mut().find(|s| s.name == stage_name) else {
                return Err(located(format!(
                    "unknown stage {stage_name:?}; valid stages: {}",
                    one_of(names.iter().map(String::as_str))
                )));
            };
            override_param(stage, param, Param::parse_cli(value)).map_err(located)?;
            stage
                .origins
                .insert(param.to_string(), format!("--set {set}"));
        }

        // Stages that exist only in other profiles.
        let absent: HashMap<String, Vec<String>> = decl
            .stage
            .iter()
            .filter(|s| {
                !s.profiles.is_empty() && !s.profiles.iter().any(|p| p.get_ref() == profile)
            })
            .map(|s| {
                let profiles = s.profiles.iter().map(|p| p.get_ref().clone()).collect();
                (s.name.get_ref().clone(), profiles)
            })
            .collect();
        for s in &decl.stage {
            for p in &s.profiles {
                if !available_profiles(file).contains(p.get_ref()) {
                    return Err(src.err(
                        p.span().start,
                        format!(
                            "stage {:?}: unknown profile {:?}; valid profiles: {}",
                            s.name.get_ref(),
                            p.get_ref(),
                            one_of(available_profiles(file).iter().map(String::as_str))
                        ),
                    ));
                }
            }
        }
        stages.retain(|s| !absent.contains_key(&s.name));
        for stage in &mut stages {
            if let Some(input) = stage
                .inputs
                .iter()
                .find(|i| !i.optional && absent.contains_key(&i.stage))
            {
                return Err(ConfigError {
                    location: format!("{} (profile {profile})", file.display()),
                    message: format!(
                        "stage {:?} needs stage {:?}, which exists only in profiles {}; make the input optional (\"{}?\")",
                        stage.name,
                        input.stage,
                        absent[&input.stage].join(", "),
                        input.stage
                    ),
                });
            }
            stage.inputs.retain(|i| !absent.contains_key(&i.stage));
        }

        // Every stage's params through its kind's typed struct: a bad value stops here.
        for stage in &stages {
            let kind = registry.get(&stage.kind).expect("kinds are checked above");
            kind.check_params(&stage.params).map_err(|e| {
                let location = stage
                    .origins
                    .get(&e.param)
                    .or_else(|| {
                        // `grid_w_adv[1]` was set where `grid_w_adv` was.
                        let base = e.param.split(['[', '.']).next().unwrap_or_default();
                        stage.origins.get(base)
                    })
                    .cloned()
                    .unwrap_or_else(|| stage.declared_at.clone());
                ConfigError {
                    location,
                    message: format!(
                        "stage {:?} (kind {}): param {}: {}",
                        stage.name, stage.kind, e.param, e.message
                    ),
                }
            })?;
        }

        let description = if pdecl.profile.expected_runtime.is_empty() {
            pdecl.profile.description
        } else {
            format!(
                "{} (expected run time {})",
                pdecl.profile.description, pdecl.profile.expected_runtime
            )
        };
        Ok(Pipeline {
            file: file.to_path_buf(),
            root: file
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            description: decl.pipeline.description,
            profile: profile.to_string(),
            profile_description: description,
            stages,
        })
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// `name` and every stage it depends on, in pipeline order; unknown names are a ConfigError.
    pub fn with_ancestors(&self, name: &str) -> Result<Vec<&Stage>, ConfigError> {
        if self.stage(name).is_none() {
            return Err(ConfigError {
                location: format!("stage {name}"),
                message: format!(
                    "unknown stage {name:?} in {}; valid stages: {}",
                    self.file.display(),
                    one_of(self.stages.iter().map(|s| s.name.as_str()))
                ),
            });
        }
        let mut wanted = vec![name.to_string()];
        let mut i = 0;
        while i < wanted.len() {
            let stage = self.stage(&wanted[i]).expect("validated");
            for input in &stage.inputs {
                if !wanted.contains(&input.stage) {
                    wanted.push(input.stage.clone());
                }
            }
            i += 1;
        }
        Ok(self
            .stages
            .iter()
            .filter(|s| wanted.contains(&s.name))
            .collect())
    }
}

fn override_param(stage: &mut Stage, param: &str, value: Param) -> Result<(), String> {
    let valid = || one_of(stage.params.keys().map(String::as_str));
    let Some(declared) = stage.params.get(param) else {
        return Err(format!(
            "stage {:?} has no param {param:?}; valid params: {}",
            stage.name,
            valid()
        ));
    };
    let value = value
        .coerce_to(declared)
        .map_err(|m| format!("param {}.{param}: {m}", stage.name))?;
    if param == "seed" {
        match value {
            Param::Int(seed) if seed >= 0 => stage.seed = seed as u64,
            _ => {
                return Err(format!(
                    "param {}.seed must be a non-negative integer",
                    stage.name
                ))
            }
        }
    }
    stage.params.insert(param.to_string(), value);
    Ok(())
}

/// Kahn's algorithm, taking ready stages in declaration order. On a cycle, returns one cycle.
fn topological_order(stages: &[Stage]) -> Result<Vec<String>, Vec<String>> {
    let mut done: Vec<String> = Vec::new();
    while done.len() < stages.len() {
        let ready = stages
            .iter()
            .find(|s| !done.contains(&s.name) && s.inputs.iter().all(|i| done.contains(&i.stage)));
        match ready {
            Some(s) => done.push(s.name.clone()),
            None => {
                // Walk unfinished inputs until a stage repeats: that is a cycle.
                let mut path: Vec<String> = Vec::new();
                let mut current = stages
                    .iter()
                    .find(|s| !done.contains(&s.name))
                    .expect("some left");
                loop {
                    if let Some(pos) = path.iter().position(|n| n == &current.name) {
                        let mut cycle = path[pos..].to_vec();
                        cycle.push(current.name.clone());
                        return Err(cycle);
                    }
                    path.push(current.name.clone());
                    let next = current
                        .inputs
                        .iter()
                        .find(|i| !done.contains(&i.stage))
                        .expect("blocked stage has an unfinished input");
                    current = stages
                        .iter()
                        .find(|s| s.name == next.stage)
                        .expect("validated");
                }
            }
        }
    }
    Ok(done)
}
